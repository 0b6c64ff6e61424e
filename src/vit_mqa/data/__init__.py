"""Pictures and datasets: reading image files, finding the ink, preprocessing, datasets,
augmentation."""
