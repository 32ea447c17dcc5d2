//! Uploading one local file to one blob, and downloading one verified (being written).
