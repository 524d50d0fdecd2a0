def band(total: float) -> str:
    """Size band of an order total."""
    if total < 50:
        return "small"
    if total < 250:
        return "medium"
    return "large"
