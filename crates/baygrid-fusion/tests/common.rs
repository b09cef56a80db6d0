use std::path::PathBuf;

use baygrid_fusion::data::Table;

pub fn fate(file: &str) -> Table {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fate")
        .join(file);
    Table::read_csv(&path).unwrap_or_else(|e| panic!("the shared FATE data is missing: {e}"))
}
