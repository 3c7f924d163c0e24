"""Installing what the engine needs inside Slicer, the way Slicer's extensions do it: PyTorch through the
PyTorch extension (the build that fits this computer's GPU), nnU-Net through the NNUNet extension's
installer (Slicer's own SimpleITK and torch kept), the rest with pip; then the result is checked and an
installer's wrong pin repaired. Only when the user asked; nothing is installed at import time."""
from __future__ import annotations

import importlib
import subprocess
from dataclasses import dataclass, field

import slicer


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
        repairable = [p for p in left if p.requirement != TORCH and p.installed is not None]
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
        if not installer.setupPythonRequirements(requirement):
            raise TuckerSegmentError(f"the NNUNet extension could not install {requirement}; see the Python "
                                     "console for its messages")
        return bool(installer.needsRestart)

    @staticmethod
    def _pip(requirements: list) -> None:
        from TuckerSegmentLib.errors import TuckerSegmentError
        try:
            slicer.util.pip_install(requirements)
        except subprocess.CalledProcessError as error:
            raise TuckerSegmentError(f"pip could not install {' '.join(requirements)} (exit code "
                                     f"{error.returncode}); see the Python console") from error
        importlib.invalidate_caches()
