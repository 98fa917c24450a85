"""``python -m benchmarks``: runs the bench (see ``benchmarks.bench``)."""

from benchmarks.bench import main

if __name__ == "__main__":
    main()
