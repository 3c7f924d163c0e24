"""TuckerSegment's Slicer side (as SlicerNNUnet splits it): ``Parameters`` (the parameter node),
``Logic`` (MRML in and out, jobs in the worker process), ``InstallLogic`` (dependencies), ``Widget``
(binds the panel to the Logic), ``SceneNodes`` (MRML helpers) and ``SelfTest``. The engine is
``TuckerSegmentLib``, which imports nothing of Slicer or Qt. Every file here parses on Python 3.9 so that
an old Slicer can load the module and say what it needs."""
