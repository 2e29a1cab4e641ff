"""`python -m taskvec`: the `taskvec` console script."""

from taskvec.cli.app import main

if __name__ == "__main__":
    main()
