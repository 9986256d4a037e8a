//! personalizer
