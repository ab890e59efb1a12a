"""Apply a plan: make exactly its changes, in order, stopping at the first failure.

A failure leaves the changes made so far in place; every change is one a later plan
recomputes from the state, so running apply again finishes the job (a key created
without its alias is found again by its ``hsmkeys:provision-alias`` tag).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hsmkeys.errors import KMSError, UnsupportedOperationException
from hsmkeys.kmsclient import KmsApi
from hsmkeys.provision.keymaterial import KeyMaterial, wrap_key_material
from hsmkeys.provision.plan import THIS_KEY, Call, Change, Plan
from hsmkeys.provision.schema import ProvisionError

__all__ = ["WRAPPING_KEY_SPEC", "apply_plan"]

#: RSA size asked of GetParametersForImport; 3072 bits is AWS's advice for new imports.
WRAPPING_KEY_SPEC = "RSA_3072"


def apply_plan(
    api: KmsApi,
    plan: Plan,
    *,
    progress: Callable[[str], None] = lambda _: None,
    done: Callable[[Change], None] = lambda _: None,
) -> None:
    """Make every change of ``plan``. Raises ProvisionError naming the change that failed
    (with its KMS error) and how many were made before it."""
    created: dict[str, str] = {}  # entry alias -> key created by this apply
    total = len(plan.changes)
    for index, change in enumerate(plan.changes):
        progress(f"applying {change.line}")
        key_id = change.key_id or created.get(change.alias)
        try:
            for step in change.steps:
                if isinstance(step, Call):
                    params = {k: (key_id if v is THIS_KEY else v) for k, v in step.params.items()}
                    result = api.call(step.operation, params)
                    if step.operation == "CreateKey":
                        key_id = created[change.alias] = str(result["KeyMetadata"]["KeyId"])
                else:
                    assert key_id is not None  # an import always follows its key's creation
                    import_key_material(api, key_id, step.material)
        except (KMSError, ValueError) as exc:
            reason = f"{exc.code}: {exc.message}" if isinstance(exc, KMSError) else str(exc)
            raise ProvisionError(
                f"{change.line}: {reason} ({index} of {total} change(s) were made before it; "
                "fix the cause and apply again: it continues from the current state)"
            ) from None
        done(change)


def import_key_material(api: KmsApi, key_id: str, material: KeyMaterial) -> None:
    """GetParametersForImport, wrap ``material`` locally, ImportKeyMaterial (no expiry).

    The strongest wrapping algorithm the server's HSM accepts is used: an HSM that cannot
    unwrap one answers UnsupportedOperationException and the next is asked for.
    """
    parameters: dict[str, Any] | None = None
    for algorithm in material.wrapping_algorithms:
        try:
            parameters = api.call(
                "GetParametersForImport",
                {"KeyId": key_id, "WrappingAlgorithm": algorithm, "WrappingKeySpec": WRAPPING_KEY_SPEC},
            )
        except UnsupportedOperationException:
            continue
        break
    if parameters is None:
        raise UnsupportedOperationException("the server's HSM accepts none of the wrapping algorithms")
    wrapped = wrap_key_material(material, parameters["PublicKey"], algorithm)
    api.call(
        "ImportKeyMaterial",
        {
            "KeyId": key_id,
            "ImportToken": parameters["ImportToken"],
            "EncryptedKeyMaterial": wrapped,
            "ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE",
        },
    )
