"""Container image references, and a tag resolved to the digest it names now.

A tag can be moved to other code after a deploy; a digest names these bytes. So a fleet
given `ghcr.io/you/actex:v1` asks the registry once, at deploy, which manifest the tag names
(the OCI distribution API: `HEAD /v2/<repository>/manifests/<tag>`, its Docker-Content-Digest)
and puts only `ghcr.io/you/actex@sha256:<hex>` on its VMs.

Credentials: a registry asking for a token (401 with `WWW-Authenticate: Bearer realm=...`)
gets an anonymous one from its realm; Google's registries (gcr.io, *-docker.pkg.dev) get the
deployer's Application Default Credentials, over https only. Nothing is logged but names.
A registry on a loopback address (tests, a local mirror) is spoken to over http, as docker does.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# The distribution reference grammar, simplified: [host[:port]/]path[:tag][@digest].
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(rf"^(?P<name>(?:(?P<host>[A-Za-z0-9.-]+(?::\d+)?)/)?{_COMPONENT}(?:/{_COMPONENT})*)"
                        r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
# Manifest types a tag may name: a multi-platform index, or one image's manifest.
_ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
_GOOGLE_HOST = re.compile(r"^(?:[a-z0-9-]+\.)?gcr\.io$|^[a-z0-9-]+-docker\.pkg\.dev$")


@dataclass(frozen=True)
class ImageRef:
    name: str  # as given, without tag or digest: ghcr.io/you/actex
    host: str  # the registry API's host[:port]
    repository: str  # you/actex (library/ added for Docker Hub's single names)
    tag: str | None
    digest: str | None

    @property
    def pinned(self) -> str:
        """name@digest; ValueError without a digest."""
        if self.digest is None:
            raise ValueError(f"{self.name}: no digest")
        return f"{self.name}@{self.digest}"


def parse_image(image: str) -> ImageRef:
    """'ghcr.io/you/actex:v1' -> ImageRef; ValueError (one line) when it is no image reference."""
    match = _REFERENCE.match(image)
    if not match:
        raise ValueError(f"{image!r} is not an image reference like ghcr.io/you/actex:v1 or name@sha256:<64 hex>")
    host = match["host"]
    name = match["name"]
    path = name[len(host) + 1:] if host else name
    if host is not None and "." not in host and ":" not in host and host != "localhost":
        host, path = None, name  # 'you/actex': the first part is a Docker Hub namespace, not a host
    if host is None:
        host, path = "registry-1.docker.io", path if "/" in path else f"library/{path}"
    tag = match["tag"] or (None if match["digest"] else "latest")
    return ImageRef(name, host, path, tag, match["digest"])


def resolve_digest(image: str, *, timeout_s: float = 30.0) -> str:
    """`image` pinned by digest: itself if it has one, else name@<the digest its tag names
    now>, asked of its registry. ValueError (one line naming the image) when the registry has
    no such tag, refuses us, or cannot be reached: only a digest may reach the VMs."""
    ref = parse_image(image)
    if ref.digest is not None:
        return ref.pinned
    url = f"{_scheme(ref.host)}://{ref.host}/v2/{ref.repository}/manifests/{urllib.parse.quote(ref.tag)}"
    try:
        digest = _manifest_digest(url, ref, timeout_s)
    except urllib.error.HTTPError as error:
        reason = "no such tag" if error.code == 404 else f"HTTP {error.code} {error.reason}"
        raise ValueError(f"image {image}: cannot resolve its tag to a digest ({reason}); give name@sha256:<64 hex>") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"image {image}: cannot resolve its tag to a digest ({error}); give name@sha256:<64 hex>") from None
    return f"{ref.name}@{digest}"


def _scheme(host: str) -> str:
    hostname = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if hostname == "localhost":
        return "http"
    try:
        return "http" if ipaddress.ip_address(hostname.strip("[]")).is_loopback else "https"
    except ValueError:
        return "https"


def _manifest_digest(url: str, ref: ImageRef, timeout_s: float) -> str:
    headers = {"Accept": _ACCEPT}
    token = _google_token(ref.host)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = _request(url, headers, timeout_s)
    except urllib.error.HTTPError as error:
        challenge = error.headers.get("WWW-Authenticate", "") if error.code == 401 else ""
        if not challenge.lower().startswith("bearer ") or "Authorization" in headers:
            raise
        headers["Authorization"] = f"Bearer {_anonymous_token(challenge, ref, timeout_s)}"
        response = _request(url, headers, timeout_s)
    with response:
        digest = response.headers.get("Docker-Content-Digest") or f"sha256:{hashlib.sha256(response.read()).hexdigest()}"
    if not DIGEST.match(digest):
        raise ValueError(f"the registry answered digest {digest[:80]!r}, not sha256:<64 hex>")
    return digest


def _request(url: str, headers: dict[str, str], timeout_s: float):
    # GET, not HEAD: some registries omit the digest header on HEAD; the manifest is small.
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)  # noqa: S310 (http(s) only)


def _anonymous_token(challenge: str, ref: ImageRef, timeout_s: float) -> str:
    """A pull token from the realm a 401 named (Docker Hub, ghcr.io: anonymous for public images)."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = fields.get("realm", "")
    parts = urllib.parse.urlsplit(realm)
    if parts.scheme not in ("http", "https") or (parts.scheme == "http" and _scheme(parts.netloc) != "http"):
        raise ValueError(f"the registry's token realm {realm[:80]!r} is not an https URL")
    query = {"service": fields.get("service", ref.host), "scope": fields.get("scope", f"repository:{ref.repository}:pull")}
    with urllib.request.urlopen(f"{realm}?{urllib.parse.urlencode(query)}", timeout=timeout_s) as response:  # noqa: S310
        body = json.loads(response.read())
    token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise ValueError("the registry's token realm answered no token")
    return token


def _google_token(host: str) -> str | None:
    """The deployer's ADC access token, for Google's registries only (never sent elsewhere)."""
    if not _GOOGLE_HOST.match(host):
        return None
    try:
        import google.auth  # optional (the gcs extra brings it); function-local: most deploys never need it
        import google.auth.transport.requests

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
        return credentials.token
    except Exception:  # noqa: BLE001 (no credentials here: the anonymous flow may still work)
        return None
