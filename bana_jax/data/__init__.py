"""Data: sources (synthetic, COCO, VOC+SBD), transforms, batching and loading."""
