"""A hidden quality for simulated labelers in tests: the number at the end of a completion."""


def last_number(prompt: str, completion: str) -> float:
    return float(completion.split()[-1])
