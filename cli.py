"""`python cli.py …` from a checkout: a thin door to dmf_export.cli."""
from dmf_export.cli import main

if __name__ == "__main__":
    main()
