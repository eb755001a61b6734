"""``python -m relaybus``: the ``relaybus`` command."""

from relaybus.cli import main

if __name__ == "__main__":
    main()
