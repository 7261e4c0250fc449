"""Data sources: each reads one kind of input into records (one dict per (ref, sentence)).

- :mod:`.refer` -- the refer-format RefCOCO family (refs pickle + COCO instances.json + images);
- :mod:`.manifest` -- your own data as JSON Lines / Parquet rows (image, text, mask);
- :mod:`.shards` -- Parquet shards with the image bytes inside (written by ``refseg prepare``);
- :mod:`.synthetic` -- a small generated set in the refer format (shapes that only language tells apart).
"""
