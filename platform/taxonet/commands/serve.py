"""CLI verbs for the serve area (placeholder until the area lands)."""


def register(subparsers) -> None:  # noqa: ANN001
    """Add this area's verbs to the parser."""
