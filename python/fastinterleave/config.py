"""Settings users may change (``fastinterleave.CONFIG``)."""


class _Engine:
    def __init__(self):
        # When False, nodes the C++ engine cannot run natively raise instead of
        # calling back into Python. Tests use it to prove the engine does the work.
        self.python_fallback = True


class _App:
    def __init__(self):
        # Replace top-level locals holding saved proxies with their values after a trace.
        self.FRAME_INJECTION = True


class Config:
    def __init__(self):
        self.engine = _Engine()
        self.APP = _App()


CONFIG = Config()
