"""File plumbing every stage uses: atomic writes, directory locks, sha256 of files and folders, and sealed records."""
