"""`python cli.py …` runs the drip command line from a checkout (the same as `drip …`)."""

from drip.cli import main

if __name__ == "__main__":
    main()
