//! Aligned text tables for humans.

use serde_json::Value;

/// A JSON value as a cell: strings bare, null/absent empty.
pub fn s(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(x) => x.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Pretty JSON on stdout (`--json`).
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Two columns: name and value.
    pub fn kv(pairs: &[(&str, &Value)]) -> Self {
        let mut t = Self {
            headers: Vec::new(),
            rows: Vec::new(),
        };
        t.rows = pairs
            .iter()
            .map(|(k, v)| vec![k.to_string(), s(v)])
            .collect();
        t
    }

    pub fn rows(mut self, rows: impl IntoIterator<Item = Vec<String>>) -> Self {
        self.rows.extend(rows);
        self
    }

    pub fn render(&self) -> String {
        let cols = self
            .headers
            .len()
            .max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.headers)
            .chain(&self.rows)
            .filter(|r| !r.is_empty())
        {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = width[i]))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns() {
        let t = Table::new(&["ID", "STATUS"]).rows([
            vec!["abc".into(), "running".into()],
            vec!["a".into(), "".into()],
        ]);
        assert_eq!(t.render(), "ID   STATUS\nabc  running\na\n");
    }
}
