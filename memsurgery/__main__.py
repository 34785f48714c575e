"""`python -m memsurgery` runs the same CLI as the `memsurgery` script."""

from memsurgery.cli import main

if __name__ == "__main__":
    main()
