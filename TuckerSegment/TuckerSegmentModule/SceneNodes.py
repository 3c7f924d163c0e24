"""MRML in and out for the Logic: a volume node read as an engine ``Volume``, a result written into a
segmentation node (whole or not at all), tables, label export and node removal. Runs on Slicer's GUI
thread; no torch."""
from __future__ import annotations

import slicer
import vtk


def readVolume(volumeNode):
    """A copy of the node's voxels (k, j, i) and its IJK-to-world matrix (parent linear transform applied) as an
    engine ``Volume``: what the worker segments, independent of later edits to the node."""
    from TuckerSegmentLib.errors import VolumeError
    from TuckerSegmentLib.image.volume import Volume
    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
        raise VolumeError("no CT volume selected; load a CT volume and choose it as the input")
    if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise VolumeError(f"{volumeNode.GetName()} is a label map; choose a CT volume as the input")
    if volumeNode.GetImageData() is None:
        raise VolumeError(f"{volumeNode.GetName()} has no voxels; load a CT volume")
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToWorld = slicer.util.arrayFromVTKMatrix(matrix)
    parent = volumeNode.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise VolumeError(f"{volumeNode.GetName()} is under a non-linear transform; harden the transform "
                              "(Transforms module) or remove it, then segment")
        toWorld = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(toWorld)
        ijkToWorld = slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToWorld
    return Volume(slicer.util.arrayFromVolume(volumeNode).copy(), ijkToWorld)


def writeSegmentation(result, volumeNode, segmentationNode):
    """Import the labels into a staging node, then hand its segments to the target; temporary nodes
    are removed whatever happens."""
    from TuckerSegmentLib.segment.provenance import provenance
    scene = slicer.mrmlScene
    transformId = volumeNode.GetTransformNodeID()
    staging = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TuckerSegment staging")
    staging.SetHideFromEditors(True)
    temporary = [staging]
    try:
        staging.SetAndObserveTransformNodeID(transformId)
        staging.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        labelmap = _labelmapNode(result, volumeNode, temporary)
        if result.labels.any() and not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
                labelmap, staging):
            raise RuntimeError("Slicer could not import the label map into a segmentation")
        tags = provenance(result)
        byValue = {s.value: s for s in result.segments}
        segmentation = staging.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            label = byValue[segment.GetLabelValue()]
            segment.SetName(label.name)
            segment.SetColor(*label.color)
            if label.terminology is not None:
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), label.terminology.to_slicer_string())
            for key, value in tags.items():
                segment.SetTag(key, value)
        if segmentationNode is None:
            segmentationNode = staging
            temporary.remove(staging)
            segmentationNode.SetName(scene.GenerateUniqueName(f"{volumeNode.GetName()} segmentation"))
            segmentationNode.SetHideFromEditors(False)
            _placeInHierarchy(segmentationNode, volumeNode)
        else:
            segmentationNode.SetAndObserveTransformNodeID(transformId)
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentationNode.GetSegmentation().DeepCopy(segmentation)
        for key, value in tags.items():
            segmentationNode.SetAttribute(key, value)
        if segmentationNode.GetDisplayNode() is None:
            segmentationNode.CreateDefaultDisplayNodes()
        return segmentationNode
    finally:
        for node in temporary:
            removeWithDependents(node)

def _labelmapNode(result, volumeNode, temporary: list):
    """A labelmap node on the volume's grid (and transform) holding the result, coloured and named by a
    colour table; both nodes are appended to ``temporary`` as soon as they exist."""
    scene = slicer.mrmlScene
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "TuckerSegment colors")
    temporary.append(colors)
    colors.SetHideFromEditors(True)
    colors.SetTypeToUser()
    largest = max((s.value for s in result.segments), default=0)
    colors.SetNumberOfColors(largest + 1)
    for value in range(largest + 1):
        colors.SetColor(value, "(none)", 0.0, 0.0, 0.0, 0.0)
    for segment in result.segments:
        colors.SetColor(segment.value, segment.name, *segment.color, 1.0)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "TuckerSegment labels")
    temporary.append(labelmap)
    labelmap.SetHideFromEditors(True)
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    labelmap.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    slicer.util.updateVolumeFromArray(labelmap, result.labels)
    labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return labelmap

def _placeInHierarchy(node, volumeNode) -> None:
    """Put a new segmentation beside its volume in the subject hierarchy (the volume's study)."""
    hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
    volumeItem = hierarchy.GetItemByDataNode(volumeNode) if hierarchy else 0
    if not volumeItem:
        return
    parent, item = hierarchy.GetItemParent(volumeItem), hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)


def fillTable(table, columns, rows) -> None:
    """Replace ``table``'s contents: a string column where the first row holds text, else a double column."""
    import numbers
    table.RemoveAllColumns()
    for index, name in enumerate(columns):
        numeric = bool(rows) and isinstance(rows[0][index], numbers.Number)
        column = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        column.SetName(name)
        for row in rows:
            column.InsertNextValue(float(row[index]) if numeric else str(row[index]))
        table.AddColumn(column)
    table.Modified()


def exportLabels(segmentationNode, segmentIds, volumeNode):
    """The segments as one label map (value = position in ``segmentIds`` + 1) on the volume's grid."""
    scene = slicer.mrmlScene
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "TuckerSegment export")
    try:
        ids = vtk.vtkStringArray()
        for segmentId in segmentIds:
            ids.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap,
                                                                                 volumeNode):
            raise RuntimeError("Slicer could not export the segments to a label map")
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        removeWithDependents(labelmap)


def removeWithDependents(node) -> None:
    """Remove a node and the display and storage nodes that only it uses."""
    scene = slicer.mrmlScene
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        return
    dependents = []
    if node.IsA("vtkMRMLDisplayableNode"):
        dependents += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        dependents += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and scene.GetNodeByID(dependent.GetID()) is not None:
            scene.RemoveNode(dependent)
