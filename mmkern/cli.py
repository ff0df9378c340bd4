"""The ``mmkern`` console command: ``mmkern train ...`` (``python -m mmkern.train``), ``mmkern bench ...``
(``python -m mmkern.bench``) and ``mmkern tune ...`` (``python -m mmkern.bench.tune``)."""

import sys

COMMANDS = {"train": "mmkern.train", "bench": "mmkern.bench.command", "tune": "mmkern.bench.tune"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: mmkern {{{','.join(COMMANDS)}}} [options]   (mmkern <command> --help for its options)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
