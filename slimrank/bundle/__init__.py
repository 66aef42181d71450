"""The versioned model bundle: manifest, checksums, atomic publish, safe load."""
