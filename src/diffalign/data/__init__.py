"""Datasets on disk: preference pairs (``diffalign data prefs``) and their builders."""
