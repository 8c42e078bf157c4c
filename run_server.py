"""dealmail's server entry point: load the config, build the application, serve until SIGTERM.

    python run_server.py [--config PATH] [--set section.key=value ...] [--log-level LEVEL]

is the same as ``dealmail serve``.
"""

import sys

from dealmail.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
