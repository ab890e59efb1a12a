"""The implementations of the KMS operations, one module per family.

Each public function is ``op(store, call, **request_members)`` and is reached only
through :mod:`hsmkeys.operations` (which authorizes and audits around it).
"""
