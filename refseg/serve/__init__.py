"""Online segmentation on Ray Serve: an HTTP API with dynamic batching and a page to try it.

- :mod:`refseg.serve.options` -- ``ServeOptions`` and their checks (no torch, no Ray);
- :mod:`refseg.serve.codec` -- request parsing and validation, RLE / PNG responses (no Ray);
- :mod:`refseg.serve.app` -- the Serve deployment and its routes, ``make_app`` / ``build_app``;
- :mod:`refseg.serve.run` -- ``deploy`` and ``serve_forever`` (``refseg serve``);
- ``page/`` -- index.html + app.js, served at ``/`` (no build step).

Importing this package imports neither torch nor ray.
"""
