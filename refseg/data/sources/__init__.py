"""Data sources: each reads one kind of input into records (one dict per (ref, sentence)).

- :mod:`.refer` -- the refer-format RefCOCO family (refs pickle + COCO instances.json + images);
- :mod:`.grefcoco` -- gRefCOCO: refs naming one object, several, or none (read through ``refer.load_split``);
- :mod:`.coco_files` -- what both read: the refs pickle (globals refused), instances.json, image folders;
- :mod:`.manifest` -- your own data as JSON Lines / Parquet rows (image, text, mask);
- :mod:`.shards` -- Parquet shards with the image bytes inside (written by ``refseg prepare``);
- :mod:`.synthetic` -- a small generated set in the refer format (shapes that only language tells apart);
- :mod:`.synthetic_generalized` -- the same shapes world in the gRefCOCO layout (one, several or no targets).
"""
