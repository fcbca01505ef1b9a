"""``python -m persona_compass.cli``: the same as the ``persona-compass`` command."""

from persona_compass.cli import main

if __name__ == "__main__":
    main()
