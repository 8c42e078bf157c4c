"""Two rooms share this package (docs/architecture.md):

* the ground, imported by everyone and importing nothing of dealmail: ``config``, ``clock``,
  ``addresses``, ``schedules``, ``passwords``, ``logs``;
* the application on top, which wires everything: ``app`` (the one application object),
  ``cli``, ``prefork``, ``inspect``.
"""
