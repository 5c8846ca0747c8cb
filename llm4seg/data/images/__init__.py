"""2D data: the datasets of images that data.load_dataset serves from files (Kvasir-SEG, BUSI, ISIC 2018,
TN-SCUI, folder), from the owners' layouts to the items. In reading order:

    raw_layouts.py  the datasets as their owners ship them: RAW_DATASETS, name -> RawDataset (where the layout
                    sits under a root, how its images and masks pair up into Case records), Kvasir-SEG's download
    read.py         reading one case: image, mask(s) or label map, resize, augment (augmentation_generator),
                    normalise; case_problems names each unusable file of a case
    cache.py        the decoded-once cache of cases (its docstring: what it holds, when it is rebuilt), and
                    SegmentationFiles, the dataset of cases read from files
    classes.py      a multi-class folder's class file (classes.json) and the label values its masks hold

Items (the package data's docstring gives the encodings accepted and refused):
    binary              {"image": (3, S, S) float32, "mask": (1, S, S) float32 in {0, 1}, "name": case id}
    multiclass folder   "mask": (1, S, S) int64 in 0..K-1, each mask file's value its class
What 2D and 3D share sits in data/ beside this package: cases.py (Case, find_dir, the caches' stamps and
checksums), splits.py, loader.py.
"""
