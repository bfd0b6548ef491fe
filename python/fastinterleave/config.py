"""Settings users may change (``fastinterleave.CONFIG``), with nnsight 0.4's fields.

``CONFIG.APP.FRAME_INJECTION`` and ``CONFIG.APP.CONTROL_FLOW_HANDLING`` act here;
the other fields of nnsight 0.4.11's ``CONFIG.APP`` and ``CONFIG.API`` are accepted
(code that sets them runs) and do nothing: they configure nnsight's logging, debug
messages, global patching and its remote service. ``CONFIG.save()`` writes the
settings to ``$FASTINTERLEAVE_CONFIG`` (default
``~/.config/fastinterleave/config.json``); they are read back at import.
"""

import json
import os


class _Section:
    """Named settings, read and set as attributes."""

    def __init__(self, **defaults):
        self.__dict__.update(defaults)

    def _dump(self):
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def _load(self, values):
        for key, value in values.items():
            if not key.startswith("_"):
                setattr(self, key, value)

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self._dump().items())
        return f"{type(self).__name__}({fields})"


class _Engine(_Section):
    def __init__(self):
        # When False, nodes the C++ engine cannot run natively raise instead of
        # calling back into Python. Tests use it to prove the engine does the work.
        super().__init__(python_fallback=True)


class _App(_Section):
    def __init__(self):
        super().__init__(
            # Replace top-level locals holding saved proxies with their values after a trace.
            FRAME_INJECTION=True,
            # `if proxy:` records a branch, `for x in proxy:` (session level) a loop; when
            # False, both raise an error while recording.
            CONTROL_FLOW_HANDLING=True,
            # nnsight 0.4 fields with nothing to configure here: its logger, its debug
            # error messages (errors here always name the user's line), its global
            # patching of torch while tracing (tensor factories taking proxies are
            # always recorded here).
            LOGGING=False,
            REMOTE_LOGGING=True,
            DEBUG=True,
            GLOBAL_TRACING=True,
        )


class _Api(_Section):
    """nnsight's remote service (NDIF): accepted, unused (remote execution is not supported)."""

    def __init__(self):
        super().__init__(HOST="ndif.dev", SSL=True, FORMAT="json", ZLIB=True, APIKEY=None, JOB_ID=None)


def config_path():
    """Where ``CONFIG.save()`` writes (and import reads) the settings."""
    path = os.environ.get("FASTINTERLEAVE_CONFIG")
    if path:
        return path
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "fastinterleave", "config.json")


class Config:
    def __init__(self):
        self.engine = _Engine()
        self.APP = _App()
        self.API = _Api()

    # -- nnsight 0.4's methods --------------------------------------------------------------

    def set_default_api_key(self, apikey):
        """Sets ``CONFIG.API.APIKEY`` and saves the settings (the key is unused here)."""
        self.API.APIKEY = apikey
        self.save()

    def set_default_app_debug(self, debug):
        """Sets ``CONFIG.APP.DEBUG`` and saves the settings."""
        self.APP.DEBUG = debug
        self.save()

    def save(self):
        """Writes the settings (``APP`` and ``API``) to ``config_path()``; they are read at import."""
        path = config_path()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"APP": self.APP._dump(), "API": self.API._dump()}, f, indent=2, sort_keys=True)
        os.replace(tmp, path)

    def model_dump(self):
        """The settings as a dict (nnsight's ``CONFIG.model_dump()``)."""
        return {"APP": self.APP._dump(), "API": self.API._dump()}

    def _load(self, path=None):
        path = path or config_path()
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(saved, dict):
            for name in ("APP", "API"):
                if isinstance(saved.get(name), dict):
                    getattr(self, name)._load(saved[name])

    def __repr__(self):
        return f"Config(APP={self.APP!r}, API={self.API!r})"


CONFIG = Config()
CONFIG._load()
