"""hsmkeys: an AWS KMS-style key service whose keys live in a PKCS#11 HSM.

``KeyStore.open("hsmkeys.yaml")`` opens the configured token and catalog; every AWS KMS
operation is a method of it. Errors are the KMS-named classes of :mod:`hsmkeys.errors`;
results are the frozen dataclasses of :mod:`hsmkeys.models`.
"""

from hsmkeys import errors, models
from hsmkeys.clock import Clock, FakeClock, SystemClock
from hsmkeys.config import Settings
from hsmkeys.errors import ConfigError, KMSError
from hsmkeys.keystore import DoctorReport, KeyStore, StoreStatus

__all__ = [
    "Clock",
    "ConfigError",
    "DoctorReport",
    "FakeClock",
    "KMSError",
    "KeyStore",
    "Settings",
    "StoreStatus",
    "SystemClock",
    "errors",
    "models",
]
