"""``python -m healthmesh``: the same command line as the ``healthmesh`` script."""

from healthmesh.cli import main

if __name__ == "__main__":
    main()
