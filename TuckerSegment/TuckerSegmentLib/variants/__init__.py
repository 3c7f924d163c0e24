"""Which model runs where: TotalSegmentator tasks, the variants catalogue, hardware, selection, builds, the panel's choices."""
