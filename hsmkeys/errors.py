"""KMS-named errors: the only exceptions hsmkeys raises to its callers.

    KMSError                       (code, message, http_status)
     ├── NotFoundException                 key, alias or grant does not exist
     ├── AlreadyExistsException            alias (or other name) taken
     ├── DisabledException                 key is disabled
     ├── KMSInvalidStateException          key state forbids the operation
     ├── InvalidCiphertextException        ciphertext, tag or context mismatch (also: wrapped key material that does not unwrap)
     ├── IncorrectKeyMaterialException     imported key material of the wrong length or type
     ├── IncorrectKeyException             ciphertext belongs to another key
     ├── InvalidKeyUsageException          operation or algorithm not allowed for the key
     ├── KMSInvalidSignatureException      signature does not verify
     ├── KMSInvalidMacException            MAC does not verify
     ├── ValidationException               a parameter breaks a documented limit
     ├── InvalidAliasNameException, InvalidArnException, InvalidMarkerException,
     │   InvalidGrantTokenException, InvalidGrantIdException, TagException,
     │   MalformedPolicyDocumentException, LimitExceededException,
     │   UnsupportedOperationException, DryRunOperationException
     ├── AccessDeniedException             authorization refused the call
     ├── UnrecognizedClientException, InvalidSignatureException,
     │   IncompleteSignatureException, MissingAuthenticationTokenException,
     │   InvalidSignatureException         SigV4 (server only)
     ├── SerializationException, UnknownOperationException (server only)
     ├── DependencyTimeoutException (503)  the HSM did not answer in time; retry
     └── KMSInternalException (500)        HSM or internal fault; details are logged, not returned
"""

from __future__ import annotations


class KMSError(Exception):
    """Base of every error hsmkeys raises; ``code`` is the AWS KMS error name."""

    code: str = "KMSError"
    http_status: int = 400

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code



class NotFoundException(KMSError):
    code = "NotFoundException"


class AlreadyExistsException(KMSError):
    code = "AlreadyExistsException"


class DisabledException(KMSError):
    code = "DisabledException"


class KMSInvalidStateException(KMSError):
    code = "KMSInvalidStateException"


class InvalidCiphertextException(KMSError):
    code = "InvalidCiphertextException"


class IncorrectKeyException(KMSError):
    code = "IncorrectKeyException"


class InvalidKeyUsageException(KMSError):
    code = "InvalidKeyUsageException"


class KMSInvalidSignatureException(KMSError):
    code = "KMSInvalidSignatureException"


class KMSInvalidMacException(KMSError):
    code = "KMSInvalidMacException"


class ValidationException(KMSError):
    code = "ValidationException"


class InvalidAliasNameException(KMSError):
    code = "InvalidAliasNameException"


class InvalidArnException(KMSError):
    code = "InvalidArnException"


class InvalidMarkerException(KMSError):
    code = "InvalidMarkerException"


class InvalidGrantTokenException(KMSError):
    code = "InvalidGrantTokenException"


class InvalidGrantIdException(KMSError):
    code = "InvalidGrantIdException"


class TagException(KMSError):
    code = "TagException"


class MalformedPolicyDocumentException(KMSError):
    code = "MalformedPolicyDocumentException"


class LimitExceededException(KMSError):
    code = "LimitExceededException"


class UnsupportedOperationException(KMSError):
    code = "UnsupportedOperationException"


class DryRunOperationException(KMSError):
    code = "DryRunOperationException"


class AccessDeniedException(KMSError):
    code = "AccessDeniedException"


class UnrecognizedClientException(KMSError):
    code = "UnrecognizedClientException"


class InvalidSignatureException(KMSError):
    code = "InvalidSignatureException"


class IncompleteSignatureException(KMSError):
    code = "IncompleteSignatureException"


class MissingAuthenticationTokenException(KMSError):
    code = "MissingAuthenticationTokenException"


class SerializationException(KMSError):
    code = "SerializationException"


class UnknownOperationException(KMSError):
    code = "UnknownOperationException"


class InvalidImportTokenException(KMSError):
    code = "InvalidImportTokenException"


class ExpiredImportTokenException(KMSError):
    code = "ExpiredImportTokenException"


class IncorrectKeyMaterialException(KMSError):
    code = "IncorrectKeyMaterialException"


class DependencyTimeoutException(KMSError):
    code = "DependencyTimeoutException"
    http_status = 503


class KMSInternalException(KMSError):
    code = "KMSInternalException"
    http_status = 500


class ConfigError(Exception):
    """A configuration file or environment variable is wrong; the message names the field."""
