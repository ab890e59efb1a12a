"""hsmkeys: an AWS KMS-style key service whose keys live in a PKCS#11 HSM."""
