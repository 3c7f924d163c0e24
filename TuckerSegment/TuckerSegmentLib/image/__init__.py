"""CT volumes and their geometry: reading, checking, canonical orientation, resampling."""
