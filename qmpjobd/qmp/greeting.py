"""The message a QMP server sends first on every connection."""

from __future__ import annotations


def greeting(version: tuple[int, int, int], package: str, capabilities: list[str]) -> object:
    major, minor, micro = version
    return {
        "QMP": {
            "version": {
                "qemu": {"micro": micro, "minor": minor, "major": major},
                "package": package,
            },
            "capabilities": capabilities,
        }
    }
