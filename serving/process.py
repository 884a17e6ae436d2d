"""Facts about this process that the build and the server both measure."""


def resident_bytes() -> int:
    """Resident memory of this process (Linux); 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * 4096
    except OSError:
        return 0
