//! Fuzzes recipe loading (`kiln check`, `kiln build`): any text as a recipe file must give a
//! validated recipe or diagnostics that point into it and render, never a panic (byte offsets
//! inside a multi-byte character, sizes and counts out of range, merges of odd tables).
//! A small file beside the recipe lets `[[files]]` entries reach source hashing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = kiln_fuzz::input_file("recipe", data);
    let dir = path.parent().expect("input has a directory");
    let recipe = dir.join("recipe.toml");
    std::fs::rename(&path, &recipe).expect("rename input");
    std::fs::write(dir.join("motd"), b"hello\n").expect("write source file");
    match kiln_model::recipe::load(&recipe) {
        Ok(r) => {
            let _ = r.output_name();
            let _ = r.recipe_files();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
