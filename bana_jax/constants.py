"""Names and numbers shared by data, models, losses and metrics (defined once, here)."""

import numpy as np

# Label value of pixels that no loss or score counts (VOC borders, boxes' unreliable pixels).
IGNORE_INDEX = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# The Caffe VGG16 input convention (the official code's): BGR minus this mean, no scaling.
CAFFE_MEAN_BGR = np.array([104.008, 116.669, 122.675], np.float32)
