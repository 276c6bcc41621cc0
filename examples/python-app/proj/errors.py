"""The project's own exception classes: results name them as ``proj.errors.<Class>``."""


class PaymentDeclined(Exception):
    """A card was refused."""


class TransientError(Exception):
    """Something that may work if tried again later."""


class LedgerError(Exception):
    """Raised with a non-JSON argument (a Receipt)."""


class Receipt:
    """Not JSON-serializable on purpose; its repr is stable."""

    def __init__(self, number):
        self.number = number

    def __repr__(self):
        return f"Receipt(number={self.number})"
