"""XLA flags of every test process (pytest's and the subprocesses it starts): N forced CPU devices,
and no LLVM optimisation passes. The tests' programs are tiny, so compile time is most of the
suite's time; the arithmetic is the same (XLA does not enable fast-math on CPU either way)."""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def cpu_xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
