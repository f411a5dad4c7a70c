//! Where a config key is written: the line of a key path in a TOML text, taken
//! from the parser's spans.
//!
//! Why spans and not a text search: TOML writes one key in many forms (a
//! `[section]` key, the n-th `[[array]]` element, an inline table
//! `pools = [{ weight = -1 }]`, a dotted key `limits.max_line = 5`, or a path
//! split between a table header and a dotted key). A line scan has to guess
//! at each; the parser already knows, and `toml::de::DeTable` keeps a byte
//! span on every key and every value.

use toml::de::{DeArray, DeTable};

/// One step of a key path: a table key, or an index into an array (of tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySeg<'a> {
    Key(&'a str),
    Index(usize),
}

/// The 1-based line where `path` is written in `text`.
///
/// It is the line of the path's last *key* as written (`weight` in
/// `weight = -1`; for a table, its header `[extranonce]`), which names the
/// setting better than the value, since a value may span lines. A path that
/// ends in an index gives the line where that element starts (its `[[header]]`
/// or its `{` in an inline array).
///
/// `None` when the path is not in the text (say a field left at its default:
/// the caller can ask again for the parent path) or the text is not TOML (the
/// parser's own error carries the line then).
pub fn line_of(text: &str, path: &[KeySeg]) -> Option<usize> {
    let root = DeTable::parse(text).ok()?;
    // Where we are: the table or the array the next segment looks into.
    let (mut table, mut array): (Option<&DeTable>, Option<&DeArray>) = (Some(root.get_ref()), None);
    let mut start = None;
    for seg in path {
        let value = match *seg {
            KeySeg::Key(k) => {
                // Keys are Spanned<Cow<str>>, which borrow as str: one lookup
                // gives the key's own span (not its value's).
                let (key, value) = table?.get_key_value(k)?;
                start = Some(key.span().start);
                value
            }
            KeySeg::Index(i) => {
                let value = array?.get(i)?;
                start = Some(value.span().start);
                value
            }
        };
        table = value.get_ref().as_table();
        array = value.get_ref().as_array();
    }
    start.map(|s| line_at(text, s))
}

/// `line_of` for the longest prefix of `path` that is written: a field left at
/// its default is reported at its table (`[[pools]]`, `[site]`), as the text
/// search this replaces did.
pub fn line_of_nearest(text: &str, path: &[KeySeg]) -> Option<usize> {
    (1..=path.len())
        .rev()
        .find_map(|n| line_of(text, &path[..n]))
}

/// Splits a path as config errors print it, `site.miners[3].address`, into
/// segments. An index that is not a number becomes `Index(usize::MAX)`, which
/// no array has, so `line_of` answers `None` rather than a wrong line.
pub fn parse_path(dotted: &str) -> Vec<KeySeg<'_>> {
    let mut segs = Vec::new();
    for part in dotted.split('.') {
        // `miners[3][0]` is the key `miners` then one segment per `[..]`.
        let mut pieces = part.split('[');
        let key = pieces.next().unwrap_or("");
        if !key.is_empty() {
            segs.push(KeySeg::Key(key));
        }
        for idx in pieces {
            let n = idx
                .trim_end_matches(']')
                .trim()
                .parse()
                .unwrap_or(usize::MAX);
            segs.push(KeySeg::Index(n));
        }
    }
    segs
}

/// The 1-based line holding `byte_offset` of `text` (the end of the text if the
/// offset is past it). Counts bytes, so any offset works, on a char boundary
/// or not.
pub fn line_at(text: &str, byte_offset: usize) -> usize {
    let end = byte_offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, path: &str) -> Option<usize> {
        line_of(text, &parse_path(path))
    }

    #[test]
    fn parse_path_splits_keys_and_indices() {
        use KeySeg::*;
        assert_eq!(
            parse_path("pools[1].weight"),
            [Key("pools"), Index(1), Key("weight")]
        );
        assert_eq!(
            parse_path("site.miners[3].address"),
            [Key("site"), Key("miners"), Index(3), Key("address")]
        );
        assert_eq!(
            parse_path("api.tokens[0].token"),
            [Key("api"), Key("tokens"), Index(0), Key("token")]
        );
        assert_eq!(parse_path("a[x]"), [Key("a"), Index(usize::MAX)]);
    }

    #[test]
    fn line_at_counts_newlines_before_the_offset() {
        let t = "a = 1\nb = 2\n";
        assert_eq!(line_at(t, 0), 1);
        assert_eq!(line_at(t, 5), 1); // the newline itself ends line 1
        assert_eq!(line_at(t, 6), 2);
        assert_eq!(line_at(t, 1000), 3);
    }

    #[test]
    fn section_key_and_the_section_itself() {
        let t = "[api]\nlisten = \"127.0.0.1:1\"\n\n[extranonce]\nextranonce2_size = 12\n";
        assert_eq!(line(t, "api.listen"), Some(2));
        assert_eq!(line(t, "extranonce.extranonce2_size"), Some(5));
        assert_eq!(line(t, "extranonce"), Some(4));
    }

    #[test]
    fn array_of_tables_picks_the_nth_element() {
        let t = "[api]\n\n[[api.tokens]]\nname = \"a\"\ntoken = \"x\"\n\n[[api.tokens]]\nname = \"b\"\ntoken = \"y\"\n";
        assert_eq!(line(t, "api.tokens[0].token"), Some(5));
        assert_eq!(line(t, "api.tokens[1].token"), Some(9));
        assert_eq!(line(t, "api.tokens[1]"), Some(7)); // the element's header
        assert_eq!(line(t, "api.tokens[2].token"), None);
        let p = "[[pools]]\nname='a'\n\n[[pools]]\nname='b'\nweight = -1\n";
        assert_eq!(line(p, "pools[1].weight"), Some(6));
    }

    #[test]
    fn inline_tables() {
        let t = "listen = { sv1 = \"x\" }\npools = [\n  { name = \"a\" },\n  { name = \"b\", weight = -1 },\n]\n";
        assert_eq!(line(t, "listen.sv1"), Some(1));
        assert_eq!(line(t, "pools[1].weight"), Some(4));
        assert_eq!(line(t, "pools[0]"), Some(3));
        let one = "pools = [{ name = \"a\", weight = -1 }]\n";
        assert_eq!(line(one, "pools[0].weight"), Some(1));
    }

    #[test]
    fn dotted_keys() {
        let t = "name = \"x\"\nlimits.max_line = 5\n\n[site]\nid = 1\na.b.c = 1\n";
        assert_eq!(line(t, "limits.max_line"), Some(2));
        assert_eq!(line(t, "site.a.b.c"), Some(6));
        assert_eq!(line(t, "site.a.b"), Some(6));
    }

    #[test]
    fn path_split_between_header_and_dotted_key() {
        let t =
            "[site]\nid = 1\n\n[site.limits]\nfoo = 1\nmeter.address = \"m\"\n\n[x.y]\nz.w = 2\n";
        assert_eq!(line(t, "site.limits.meter.address"), Some(6));
        assert_eq!(line(t, "x.y.z.w"), Some(9));
        assert_eq!(line(t, "x.y"), Some(8));
    }

    #[test]
    fn nearest_falls_back_to_the_enclosing_table() {
        let t = "[[pools]]\nname='a'\n\n[site]\nid = 1\n";
        assert_eq!(
            line_of_nearest(t, &parse_path("pools[0].authority_pubkey")),
            Some(1)
        );
        assert_eq!(line_of_nearest(t, &parse_path("site.limits.max")), Some(4));
        assert_eq!(line_of_nearest(t, &parse_path("site.id")), Some(5));
        assert_eq!(line_of_nearest(t, &parse_path("api.listen")), None);
    }

    #[test]
    fn missing_keys_and_bad_text_are_none() {
        let t = "[site]\nid = 1\npools = [{ name = \"a\" }]\n";
        assert_eq!(line(t, "site.name"), None);
        assert_eq!(line(t, "other"), None);
        assert_eq!(line(t, "site.id.deeper"), None); // through a non-table
        assert_eq!(line(t, "site[0]"), None); // index into a table
        assert_eq!(line(t, "site.pools[0].weight"), None);
        assert_eq!(line(t, ""), None);
        assert_eq!(line("[site\nid = 1\n", "site.id"), None);
    }
}
