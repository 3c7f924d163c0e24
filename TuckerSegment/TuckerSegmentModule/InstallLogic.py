"""Installing what the engine needs inside Slicer, the way Slicer's extensions do it: PyTorch through the
PyTorch extension (the build that fits this computer's GPU), nnU-Net through the NNUNet extension's
installer (Slicer's own SimpleITK and torch kept), the rest with pip; then the result is checked and an
installer's wrong pin repaired. Only when the user asked; nothing is installed at import time.

Success is judged by checking the installed versions again, never by an installer's return value. The
packages Slicer ships built against itself (``SLICER_BUNDLED``) and PyTorch are never installed, upgraded
or repaired with pip: every pip call carries a constraint file pinning their installed versions, and a
version of theirs outside TuckerSegment's range is reported, not "fixed"."""
from __future__ import annotations

import importlib
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import slicer

SLICER_BUNDLED = ("SimpleITK", "numpy", "vtk")  # built with Slicer; a pip wheel of another version breaks it


@dataclass
class InstallOutcome:
    """What an install did: one line per step, and whether Slicer must restart before the engine runs."""

    messages: list = field(default_factory=list)
    needsRestart: bool = False


class TuckerSegmentInstallLogic:
    """``problems()`` lists what is missing (no torch needed to ask); ``install(problems)`` fixes it or raises
    ``TuckerSegmentError`` with one line naming what failed and what to do."""

    def __init__(self, versionOf=None) -> None:
        self._versionOf = versionOf  # distribution -> installed version or None (default: the installed metadata)

    def problems(self) -> list:
        from TuckerSegmentLib.dependencies import installed_version, problems
        importlib.invalidate_caches()
        return problems(self._versionOf or installed_version)

    def install(self, problems) -> InstallOutcome:
        from TuckerSegmentLib.dependencies import NNUNET, TORCH
        from TuckerSegmentLib.errors import TuckerSegmentError
        bundled = [p for p in problems if p.requirement.distribution in SLICER_BUNDLED]
        if bundled:
            raise TuckerSegmentError("; ".join(str(p) for p in bundled) + ": it comes with Slicer, and TuckerSegment "
                                     "does not change Slicer's own packages with pip; use a Slicer release (5.10 or "
                                     "later) whose version is in that range")
        outcome = InstallOutcome()
        wanted = {p.requirement for p in problems}
        if TORCH in wanted:
            self._installTorch(TORCH.specifier)
            outcome.messages.append(f"PyTorch installed by the PyTorch extension ({TORCH.pip})")
        if NNUNET in wanted:
            outcome.needsRestart |= self._installNNUNet(f"nnunetv2=={NNUNET.minimum}")
            outcome.messages.append(f"nnU-Net installed by the NNUNet extension (nnunetv2=={NNUNET.minimum})")
        rest = sorted(r.pip for r in wanted if r not in (TORCH, NNUNET))
        if rest:
            self._pip(rest)
            outcome.messages.append("installed with pip: " + ", ".join(rest))
        self._verify(outcome)
        return outcome

    def _verify(self, outcome: InstallOutcome) -> None:
        """Check the installed versions again; repair with pip what an installer pinned wrongly (never torch,
        whose build only the PyTorch extension chooses)."""
        from TuckerSegmentLib.dependencies import TORCH
        from TuckerSegmentLib.errors import TuckerSegmentError
        left = self.problems()
        repairable = [p for p in left if p.requirement != TORCH and p.installed is not None
                      and p.requirement.distribution not in SLICER_BUNDLED]
        if repairable:
            self._pip([p.requirement.pip for p in repairable])
            outcome.messages += [f"repaired with pip, as an installer had left it: {p}" for p in repairable]
            left = self.problems()
        blocking = [p for p in left if p.blocking]
        if blocking and not outcome.needsRestart:
            raise TuckerSegmentError("still missing after the install: " + "; ".join(str(p) for p in blocking)
                                     + "; see the Python console, or restart Slicer and try again")
        outcome.messages += [f"{p}: PyTorch runs the network on the CPU instead" for p in left if not p.blocking]

    @staticmethod
    def _installTorch(specifier: str) -> None:
        from TuckerSegmentLib.errors import TuckerSegmentError
        try:
            import PyTorchUtils
        except ImportError as error:
            raise TuckerSegmentError("PyTorch is missing: install the PyTorch extension (Extensions Manager), "
                                     "restart Slicer and try again") from error
        try:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                                   torchVersionRequirement=specifier)
        except subprocess.CalledProcessError as error:
            raise TuckerSegmentError(f"PyTorch could not be installed (pip exit code {error.returncode}); see "
                                     "the Python console, or install it from the PyTorch module") from error
        if torch is None:
            raise TuckerSegmentError("PyTorch was not installed; install it from the PyTorch module, then try again")

    @staticmethod
    def _installNNUNet(requirement: str) -> bool:
        """nnU-Net through the NNUNet extension's installer; returns whether Slicer must restart."""
        from TuckerSegmentLib.errors import TuckerSegmentError
        try:
            from SlicerNNUNetLib import InstallLogic
        except ImportError as error:
            raise TuckerSegmentError("the NNUNet extension is missing: install it (Extensions Manager), restart "
                                     "Slicer and try again") from error
        installer = InstallLogic(doAskConfirmation=False)
        try:  # what it returns differs between its versions: the re-check afterwards judges
            installer.setupPythonRequirements(requirement)
        except subprocess.CalledProcessError as error:
            raise TuckerSegmentError(f"the NNUNet extension could not install {requirement} (pip exit code "
                                     f"{error.returncode}); see the Python console for its messages") from error
        return bool(getattr(installer, "needsRestart", False))

    def _pinned(self) -> list:
        """``name==version`` of the installed packages pip must leave alone: Slicer's own and PyTorch."""
        from TuckerSegmentLib.dependencies import TORCH, installed_version
        versionOf = self._versionOf or installed_version
        return [f"{name}=={versionOf(name)}" for name in (*SLICER_BUNDLED, TORCH.distribution) if versionOf(name)]

    def _pip(self, requirements: list) -> None:
        from TuckerSegmentLib.errors import TuckerSegmentError
        pinned = self._pinned()
        with tempfile.TemporaryDirectory(prefix="TuckerSegment-pip-") as folder:
            constraints = Path(folder) / "constraints.txt"
            constraints.write_text("".join(line + "\n" for line in pinned))
            try:
                slicer.util.pip_install(["--constraint", str(constraints), *requirements])
            except subprocess.CalledProcessError as error:
                raise TuckerSegmentError(f"pip could not install {' '.join(requirements)} without changing Slicer's "
                                         f"own packages or PyTorch ({', '.join(pinned)}; exit code {error.returncode})"
                                         "; see the Python console") from error
        importlib.invalidate_caches()
