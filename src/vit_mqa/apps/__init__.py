"""What people run: the ``vit-mqa`` command, the demo page and the report."""
