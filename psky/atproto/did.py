"""DID documents: the atproto subset (handle, signing key, PDS, labeler), from JSON or PLC data.

Parsing only; fetching documents lives in :mod:`psky.identity`. Real documents disagree on
details this module must absorb:

* verification-method and service ids appear absolute (``did:plc:abc#atproto``) and
  relative (``#atproto``): the PLC directory emits absolute method ids but relative service
  ids, and did:web documents do either. Both are accepted; the first item whose id matches
  wins (as in the reference implementation).
* signing keys are ``Multikey`` (multicodec-prefixed) or the legacy
  ``EcdsaSecp256k1VerificationKey2019`` / ``EcdsaSecp256r1VerificationKey2019`` bare points.
  Either way they are normalised to a did:key string.

A document whose *shape* is wrong (not an object, ``id`` not a DID, lists that are not
lists…) raises :class:`InvalidDidDocument`. An atproto entry that is present but unusable
(an unsupported key type, a key that is not on the curve, a ``#atproto_pds`` service of
the wrong type or with a non-HTTP endpoint) is reported as absent: the rest of the document
stays usable, and callers treat the missing piece exactly as resolvers in the reference
implementation do.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from psky.atproto import syntax
from psky.atproto.crypto import InvalidKey, parse_did_key, parse_verification_method

__all__ = [
    "ATPROTO_KEY",
    "ATPROTO_LABELER",
    "ATPROTO_LABEL_KEY",
    "ATPROTO_PDS",
    "DidDocument",
    "DidService",
    "DidTombstoned",
    "InvalidDid",
    "InvalidDidDocument",
    "build_did_document",
    "did_web_to_url",
    "document_from_plc_data",
    "format_plc_document",
    "is_valid_did",
    "normalize_plc_data",
    "parse_did_document",
    "plc_url",
    "validate_did",
]

#: fragments and service types atproto looks for
ATPROTO_KEY = "atproto"
ATPROTO_LABEL_KEY = "atproto_label"
ATPROTO_PDS = "atproto_pds"
ATPROTO_LABELER = "atproto_labeler"
PDS_TYPE = "AtprotoPersonalDataServer"
LABELER_TYPE = "AtprotoLabeler"

DID_CONTEXT = "https://www.w3.org/ns/did/v1"
MULTIKEY_CONTEXT = "https://w3id.org/security/multikey/v1"
K256_CONTEXT = "https://w3id.org/security/suites/secp256k1-2019/v1"
P256_CONTEXT = "https://w3id.org/security/suites/ecdsa-2019/v1"

#: bounds on hostile documents: far above anything real, small enough to walk cheaply
MAX_ITEMS = 256
MAX_URL_LENGTH = 2048


class InvalidDid(ValueError):
    """A string that is not a DID atproto can use."""


class InvalidDidDocument(ValueError):
    """A DID document (or PLC data) whose structure is not a DID document."""


class DidTombstoned(InvalidDidDocument):
    """The PLC operation is a tombstone: the DID has been deactivated."""


# --- DID syntax -----------------------------------------------------------------------

_DID_PLC_RE = re.compile(r"did:plc:[a-z2-7]{24}")
_HOST_RE = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
)
_PORT_RE = re.compile(r"[0-9]{1,5}")


def _web_host_port(did: str) -> tuple[str, int | None]:
    ident = did[len("did:web:") :]
    if ":" in ident:
        raise InvalidDid(f"did:web with a path is not supported in atproto: {did!r:.100}")
    decoded = urllib.parse.unquote(ident)
    host, sep, port = decoded.partition(":")
    if not _HOST_RE.fullmatch(host) or len(host) > 253:
        raise InvalidDid(f"did:web host is not a hostname: {did!r:.100}")
    if not sep:
        return host, None
    if not _PORT_RE.fullmatch(port) or not 0 < int(port) < 65536:
        raise InvalidDid(f"did:web port is invalid: {did!r:.100}")
    return host, int(port)


def validate_did(did: object) -> str:
    """Check DID syntax, and the method-specific rules for did:plc and did:web."""
    if not isinstance(did, str):
        raise InvalidDid(f"DID must be a string, not {type(did).__name__}")
    if not syntax.is_valid_did(did):
        raise InvalidDid(f"invalid DID syntax: {did!r:.100}")
    if did.startswith("did:plc:"):
        if not _DID_PLC_RE.fullmatch(did):
            raise InvalidDid(f"did:plc must be 24 base32 characters: {did!r:.100}")
    elif did.startswith("did:web:"):
        _web_host_port(did)
    return did


def is_valid_did(did: object) -> bool:
    try:
        validate_did(did)
    except InvalidDid:
        return False
    return True


def did_web_to_url(did: str) -> str:
    """Where a did:web document lives: ``https://host[:port]/.well-known/did.json``.

    ``localhost`` is fetched over plain HTTP so that local test networks work.
    """
    if not isinstance(did, str) or not did.startswith("did:web:"):
        raise InvalidDid(f"not a did:web: {did!r:.100}")
    validate_did(did)
    host, port = _web_host_port(did)
    scheme = "http" if host.lower() == "localhost" else "https"
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}/.well-known/did.json"


def plc_url(plc_base: str, did: str) -> str:
    """URL of a did:plc document at a PLC directory."""
    if not isinstance(did, str) or not _DID_PLC_RE.fullmatch(did):
        raise InvalidDid(f"not a did:plc: {did!r:.100}")
    return f"{plc_base.rstrip('/')}/{did}"


# --- documents ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DidService:
    """A service entry with an HTTP(S) endpoint (trailing slash removed)."""

    type: str
    endpoint: str


@dataclass(frozen=True, slots=True)
class DidDocument:
    """The atproto view of a DID document.

    ``keys`` maps fragment → did:key for every usable verification method controlled by
    the DID, and ``services`` maps fragment → :class:`DidService` for every service with an
    HTTP(S) endpoint; the named fields are the atproto entries picked out of those.
    """

    id: str
    also_known_as: tuple[str, ...] = ()
    handle: str | None = None
    signing_key: str | None = None
    pds_endpoint: str | None = None
    labeler_key: str | None = None
    labeler_endpoint: str | None = None
    keys: Mapping[str, str] = field(default_factory=dict, hash=False)
    services: Mapping[str, DidService] = field(default_factory=dict, hash=False)
    #: the document as parsed (JSON object), for caches that store and re-parse it
    raw: Mapping[str, Any] | None = field(default=None, hash=False, compare=False, repr=False)

    def service_endpoint(self, fragment: str, service_type: str) -> str | None:
        """Endpoint of service ``#fragment`` if it has the expected type (e.g. ``#bsky_fg``)."""
        return _service_endpoint(self.services, fragment.lstrip("#"), service_type)


def _service_endpoint(services: Mapping[str, DidService], fragment: str, service_type: str) -> str | None:
    svc = services.get(fragment)
    if svc is None or svc.type != service_type:
        return None
    return svc.endpoint


def _fragment(item_id: object, did: str) -> str | None:
    """The fragment of an id that refers to this DID (relative ``#x`` or absolute ``did#x``)."""
    if not isinstance(item_id, str):
        return None
    if item_id.startswith("#"):
        frag = item_id[1:]
    elif item_id.startswith(did) and item_id[len(did) : len(did) + 1] == "#":
        frag = item_id[len(did) + 1 :]
    else:
        return None
    return frag or None


def _list_field(doc: Mapping[str, Any], name: str) -> list[Any]:
    value = doc.get(name)
    if value is None:
        return []
    if isinstance(value, dict):  # a lone object where an array belongs: tolerated, as by the reference
        value = [value]
    if not isinstance(value, list):
        raise InvalidDidDocument(f"{name} must be an array")
    if len(value) > MAX_ITEMS:
        raise InvalidDidDocument(f"{name} has more than {MAX_ITEMS} entries")
    return value


def _http_endpoint(value: object) -> str | None:
    """An http(s) URL with a host, trailing slashes removed; None otherwise."""
    if not isinstance(value, str) or len(value) > MAX_URL_LENGTH:
        return None
    if any(ch <= " " or ch == "\x7f" for ch in value):
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return value.rstrip("/")


def _handle_from_aka(aka: tuple[str, ...]) -> str | None:
    for uri in aka:
        if uri.startswith("at://"):
            handle = uri[5:]
            return syntax.normalize_handle(handle) if syntax.is_valid_handle(handle) else None
    return None


def parse_did_document(doc: Any, expected_did: str | None = None) -> DidDocument:
    """Extract the atproto view of a DID document (already decoded from JSON)."""
    if not isinstance(doc, dict):
        raise InvalidDidDocument("DID document must be a JSON object")
    try:
        did = validate_did(doc.get("id"))
    except InvalidDid as e:
        raise InvalidDidDocument(f"DID document id: {e}") from None
    if expected_did is not None and did != expected_did:
        raise InvalidDidDocument(f"DID document is for {did!r:.100}, expected {expected_did!r:.100}")

    aka_raw = _list_field(doc, "alsoKnownAs")
    if not all(isinstance(a, str) for a in aka_raw):
        raise InvalidDidDocument("alsoKnownAs must be an array of strings")
    aka = tuple(aka_raw)

    keys: dict[str, str] = {}
    seen_keys: set[str] = set()
    for vm in _list_field(doc, "verificationMethod"):
        if not isinstance(vm, dict):
            raise InvalidDidDocument("verificationMethod entries must be objects")
        vm_id, vm_type = vm.get("id"), vm.get("type")
        if not isinstance(vm_id, str) or not isinstance(vm_type, str):
            raise InvalidDidDocument("verificationMethod entries need string id and type")
        controller = vm.get("controller")
        if controller is not None and not isinstance(controller, str):
            raise InvalidDidDocument("verificationMethod controller must be a string")
        frag = _fragment(vm_id, did)
        # a key controlled by another DID does not speak for this one (nor claims the id)
        if frag is None or frag in seen_keys or (controller is not None and controller != did):
            continue
        seen_keys.add(frag)
        material = vm.get("publicKeyMultibase")
        if not isinstance(material, str):
            continue
        try:
            keys[frag] = parse_verification_method(vm_type, material).did_key()
        except InvalidKey:
            continue

    services: dict[str, DidService] = {}
    seen_services: set[str] = set()
    for svc in _list_field(doc, "service"):
        if not isinstance(svc, dict):
            raise InvalidDidDocument("service entries must be objects")
        svc_id, svc_type = svc.get("id"), svc.get("type")
        if not isinstance(svc_id, str) or not isinstance(svc_type, str):
            raise InvalidDidDocument("service entries need string id and type")
        frag = _fragment(svc_id, did)
        if frag is None or frag in seen_services:
            continue
        seen_services.add(frag)
        endpoint = _http_endpoint(svc.get("serviceEndpoint"))
        if endpoint is not None:
            services[frag] = DidService(svc_type, endpoint)

    return DidDocument(
        id=did,
        also_known_as=aka,
        handle=_handle_from_aka(aka),
        signing_key=keys.get(ATPROTO_KEY),
        pds_endpoint=_service_endpoint(services, ATPROTO_PDS, PDS_TYPE),
        labeler_key=keys.get(ATPROTO_LABEL_KEY),
        labeler_endpoint=_service_endpoint(services, ATPROTO_LABELER, LABELER_TYPE),
        keys=keys,
        services=services,
        raw=doc,
    )


# --- PLC ------------------------------------------------------------------------------


def _ensure_at_prefix(handle: str) -> str:
    if handle.startswith("at://"):
        return handle
    return "at://" + handle.replace("http://", "", 1).replace("https://", "", 1)


def _ensure_http_prefix(url: str) -> str:
    if url.startswith(("http://", "https://")):
        return url
    return "https://" + url


def _str_list(data: Mapping[str, Any], name: str) -> list[str]:
    value = data.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidDidDocument(f"PLC data: {name} must be an array of strings")
    if len(value) > MAX_ITEMS:
        raise InvalidDidDocument(f"PLC data: {name} has more than {MAX_ITEMS} entries")
    return list(value)


def normalize_plc_data(data: Any) -> dict[str, Any]:
    """PLC ``/data``, a ``plc_operation`` or a legacy ``create`` op → the current data form.

    The result has ``rotationKeys``, ``verificationMethods``, ``alsoKnownAs`` and
    ``services``. A ``plc_tombstone`` raises :class:`DidTombstoned`.
    """
    if not isinstance(data, dict):
        raise InvalidDidDocument("PLC data must be a JSON object")
    op_type = data.get("type")
    if op_type == "plc_tombstone":
        raise DidTombstoned("PLC operation is a tombstone (DID deactivated)")
    if op_type == "create":
        fields = {}
        for name in ("signingKey", "recoveryKey", "handle", "service"):
            value = data.get(name)
            if not isinstance(value, str):
                raise InvalidDidDocument(f"legacy PLC create op: {name} must be a string")
            fields[name] = value
        return {
            "rotationKeys": [fields["recoveryKey"], fields["signingKey"]],
            "verificationMethods": {ATPROTO_KEY: fields["signingKey"]},
            "alsoKnownAs": [_ensure_at_prefix(fields["handle"])],
            "services": {ATPROTO_PDS: {"type": PDS_TYPE, "endpoint": _ensure_http_prefix(fields["service"])}},
        }
    if op_type not in (None, "plc_operation"):
        raise InvalidDidDocument(f"unknown PLC operation type {op_type!r:.50}")

    methods = data.get("verificationMethods")
    if not isinstance(methods, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in methods.items()
    ):
        raise InvalidDidDocument("PLC data: verificationMethods must map names to did:key strings")
    services = data.get("services")
    if not isinstance(services, dict):
        raise InvalidDidDocument("PLC data: services must be an object")
    norm_services: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        if (
            not isinstance(svc, dict)
            or not isinstance(svc.get("type"), str)
            or not isinstance(svc.get("endpoint"), str)
        ):
            raise InvalidDidDocument(f"PLC data: service {name!r:.50} needs string type and endpoint")
        norm_services[name] = {"type": svc["type"], "endpoint": svc["endpoint"]}
    if len(methods) > MAX_ITEMS or len(services) > MAX_ITEMS:
        raise InvalidDidDocument("PLC data: too many verification methods or services")
    return {
        "rotationKeys": _str_list(data, "rotationKeys"),
        "verificationMethods": dict(methods),
        "alsoKnownAs": _str_list(data, "alsoKnownAs"),
        "services": norm_services,
    }


def format_plc_document(did: str, data: Any) -> dict[str, Any]:
    """The DID document a PLC directory serves for *did* given its current data/op.

    Methods get absolute ids (``did:plc:…#atproto``) and type ``Multikey``; services get
    relative ids (``#atproto_pds``); ``@context`` lists the suites of the keys present.
    """
    validate_did(did)
    norm = normalize_plc_data(data)
    context = [DID_CONTEXT, MULTIKEY_CONTEXT]
    methods = []
    for name, key in norm["verificationMethods"].items():
        try:
            pub = parse_did_key(key)
        except InvalidKey as e:
            raise InvalidDidDocument(f"PLC data: verification method {name!r:.50}: {e}") from None
        suite = K256_CONTEXT if pub.curve == "k256" else P256_CONTEXT
        if suite not in context:
            context.append(suite)
        methods.append(
            {
                "id": f"{did}#{name}",
                "type": "Multikey",
                "controller": did,
                "publicKeyMultibase": pub.multibase(),
            }
        )
    services = [
        {"id": f"#{name}", "type": svc["type"], "serviceEndpoint": svc["endpoint"]}
        for name, svc in norm["services"].items()
    ]
    return {
        "@context": context,
        "id": did,
        "alsoKnownAs": norm["alsoKnownAs"],
        "verificationMethod": methods,
        "service": services,
    }


def document_from_plc_data(did: str, data: Any) -> DidDocument:
    """:class:`DidDocument` from PLC ``/data`` or an op from ``/log/audit`` (incl. legacy ``create``)."""
    if isinstance(data, dict) and "did" in data and data["did"] != did:
        raise InvalidDidDocument(f"PLC data is for {data['did']!r:.100}, expected {did!r:.100}")
    return parse_did_document(format_plc_document(did, data), expected_did=did)


def build_did_document(
    did: str, handle: str | None, signing_key_did_key: str, pds_endpoint: str
) -> dict[str, Any]:
    """A current-format PLC-directory document for an account (used by the local PLC)."""
    if _http_endpoint(pds_endpoint) is None:
        raise InvalidDidDocument(f"PDS endpoint must be an http(s) URL: {pds_endpoint!r:.100}")
    data = {
        "rotationKeys": [],
        "verificationMethods": {ATPROTO_KEY: signing_key_did_key},
        "alsoKnownAs": [f"at://{handle}"] if handle else [],
        "services": {ATPROTO_PDS: {"type": PDS_TYPE, "endpoint": pds_endpoint}},
    }
    return format_plc_document(did, data)
