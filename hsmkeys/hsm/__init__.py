"""HSM backends: the contract in ``base``; PKCS#11 in ``pkcs11``; in-process fake in ``memory``."""

from hsmkeys.hsm.base import AUDIT_KEY_REF, RESERVED_UUID, Hsm, HsmStatus

__all__ = ["AUDIT_KEY_REF", "RESERVED_UUID", "Hsm", "HsmStatus"]
