"""Prints the file of a shipped config: ``python -m umg_jax.configs tiny`` (no name: lists them)."""

import sys

from umg_jax import configs


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m umg_jax.configs NAME   (prints the config file's path)\n"
              "shipped: " + ", ".join(configs.names()))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        print(configs.path(argv[0]))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
