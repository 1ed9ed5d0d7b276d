"""How to reach a PACS: credentials (environment or an owner-only settings file, never the
command line), the CA bundle, the timeout, a DIMSE node for C-STORE."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

from ..errors import KidsegError

ENV_USER, ENV_PASSWORD = "KIDSEG_PACS_USER", "KIDSEG_PACS_PASSWORD"
ENV_CONFIG, ENV_CA_BUNDLE = "KIDSEG_PACS_CONFIG", "KIDSEG_PACS_CA_BUNDLE"
DEFAULT_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------------------------
# Settings: credentials, CA bundle, timeout, DIMSE
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Settings:
    """How to reach a server. ``dimse``: ``{"host", "port", "called_aet", "calling_aet"}`` to
    store results by C-STORE instead of STOW-RS."""

    user: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    ca_bundle: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    dimse: dict | None = None


def settings_path() -> Path:
    return Path(os.environ.get(ENV_CONFIG) or Path.home() / ".config" / "napari-kidseg" / "pacs.json")


def load_settings() -> Settings:
    """The settings file (when there is one, owner-readable only), then the environment on top."""
    path = settings_path()
    raw = {}
    if path.exists():
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KidsegError(
                f"holds PACS credentials but others may read it (mode {stat.S_IMODE(mode):o}); chmod 600 it", path
            )
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise KidsegError(f"is not a readable JSON settings file ({type(exc).__name__})", path) from None
        unknown = set(raw) - {f.name for f in dataclasses.fields(Settings)}
        if unknown:
            raise KidsegError(f"has unknown keys {sorted(unknown)}", path)
    s = Settings(**raw)
    s.user = os.environ.get(ENV_USER) or s.user
    s.password = os.environ.get(ENV_PASSWORD) or s.password
    s.ca_bundle = os.environ.get(ENV_CA_BUNDLE) or s.ca_bundle
    if s.ca_bundle and not Path(s.ca_bundle).is_file():
        raise KidsegError("no such CA bundle (ca_bundle / KIDSEG_PACS_CA_BUNDLE)", s.ca_bundle)
    if s.dimse is not None:
        missing = {"host", "port", "called_aet"} - set(s.dimse)
        if missing:
            raise KidsegError(f"its dimse entry lacks {sorted(missing)}", path)
    return s
