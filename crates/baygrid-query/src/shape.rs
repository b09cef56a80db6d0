//! Shape checks on DataFusion's logical plan: what an aggregate query asks for, in terms
//! the privacy engine can bound, or the reason it may not run, naming the expression.

use std::collections::BTreeMap;

use datafusion::common::Column as DfColumn;
use datafusion::logical_expr::{Expr, JoinType, LogicalPlan, Operator};

use crate::{Refusal, Table};

/// What one released number is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "column")]
pub enum Aggregate {
    /// COUNT(*) or COUNT(1): rows.
    Count,
    /// COUNT(DISTINCT <subject column>): individuals.
    Subjects,
    /// SUM(col), values clamped to the offer's range.
    Sum(String),
    /// AVG(col), values clamped to the offer's range.
    Avg(String),
}

impl Aggregate {
    /// How many equal shares of the query's ε this aggregate spends. The individuals'
    /// count is the threshold's own noisy count released again, so it costs nothing more.
    pub fn shares(&self) -> u32 {
        match self {
            Aggregate::Count | Aggregate::Sum(_) => 1,
            Aggregate::Avg(_) => 2,
            Aggregate::Subjects => 0,
        }
    }

    pub fn column(&self) -> Option<&str> {
        match self {
            Aggregate::Sum(c) | Aggregate::Avg(c) => Some(c),
            _ => None,
        }
    }
}

/// One output column: a dimension or an aggregate, from one table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Output {
    pub name: String,
    pub table: String,
    /// The dimension column, when this output is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimension: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<Aggregate>,
}

/// An accepted query: per output column what it is, and per table the filter its rows
/// pass. With two tables, each side answers over the subjects both hold.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    /// The tables read, in the order the query names them.
    pub tables: Vec<String>,
    pub outputs: Vec<Output>,
    /// Per table, the filter as SQL text (re-planned against that table alone).
    pub filters: BTreeMap<String, String>,
}

impl Shape {
    pub fn dimensions(&self) -> impl Iterator<Item = &Output> {
        self.outputs.iter().filter(|o| o.dimension.is_some())
    }

    pub fn aggregates(&self) -> impl Iterator<Item = &Output> {
        self.outputs.iter().filter(|o| o.aggregate.is_some())
    }

    /// The part of the query one table answers.
    pub fn side(&self, table: &str) -> Side {
        Side {
            table: table.to_string(),
            dimensions: self
                .dimensions()
                .filter(|o| o.table == table)
                .map(|o| o.dimension.clone().unwrap_or_default())
                .collect(),
            aggregates: self
                .aggregates()
                .filter(|o| o.table == table)
                .map(|o| o.aggregate.clone().expect("aggregates only"))
                .collect(),
            filter: self.filters.get(table).cloned(),
        }
    }

    pub fn grouped(&self) -> bool {
        self.dimensions().next().is_some()
    }
}

/// What one table's vault computes: its dimensions, its aggregates and its filter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Side {
    pub table: String,
    pub dimensions: Vec<String>,
    pub aggregates: Vec<Aggregate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
}

impl Side {
    /// Shares of ε: one for the individuals' threshold count, and each aggregate's own.
    pub fn shares(&self) -> u32 {
        1 + self.aggregates.iter().map(Aggregate::shares).sum::<u32>()
    }
}

fn refuse(reason: impl Into<String>, expression: impl std::fmt::Display) -> Refusal {
    Refusal {
        reason: reason.into(),
        expression: Some(expression.to_string()),
    }
}

struct Walk<'a> {
    tables: &'a [Table],
}

impl<'a> Walk<'a> {
    fn table(&self, column: &DfColumn) -> Result<&'a Table, Refusal> {
        let by_name = |name: &str| self.tables.iter().find(|t| t.name == name);
        match &column.relation {
            Some(relation) => by_name(relation.table()),
            None => {
                let mut holding = self
                    .tables
                    .iter()
                    .filter(|t| t.columns.iter().any(|(c, _)| *c == column.name));
                match (holding.next(), holding.next()) {
                    (Some(t), None) => Some(t),
                    _ => None,
                }
            }
        }
        .ok_or_else(|| refuse("the column's table is not one the query may read", column))
    }

    /// The filter predicate: comparisons and logic over the offer's filter or dimension
    /// columns and literals; no functions, subqueries or aggregates.
    fn predicate(
        &self,
        expr: &Expr,
        per_table: &mut BTreeMap<String, Vec<Expr>>,
    ) -> Result<(), Refusal> {
        for conjunct in split_and(expr) {
            let mut tables = Vec::new();
            self.filter_expr(conjunct, &mut tables)?;
            tables.sort();
            tables.dedup();
            match tables.as_slice() {
                [] => {
                    return Err(refuse(
                        "a filter must test a column",
                        conjunct,
                    ))
                }
                [one] => per_table.entry(one.clone()).or_default().push(conjunct.clone()),
                _ => {
                    return Err(refuse(
                        "a filter may compare columns of one table only: comparing rows across vaults needs per-row linkage",
                        conjunct,
                    ))
                }
            }
        }
        Ok(())
    }

    fn filter_expr(&self, expr: &Expr, tables: &mut Vec<String>) -> Result<(), Refusal> {
        match expr {
            Expr::Column(c) => {
                let table = self.table(c)?;
                if !table.terms.filters.contains(&c.name)
                    && !table.terms.dimensions.contains(&c.name)
                {
                    return Err(refuse(
                        format!(
                            "`{}` is not a column the offer on `{}` lets queries filter on",
                            c.name, table.name
                        ),
                        c,
                    ));
                }
                tables.push(table.name.clone());
                Ok(())
            }
            Expr::Literal(..) => Ok(()),
            Expr::BinaryExpr(b) => {
                use Operator::*;
                if !matches!(
                    b.op,
                    Eq | NotEq
                        | Lt
                        | LtEq
                        | Gt
                        | GtEq
                        | And
                        | Or
                        | Plus
                        | Minus
                        | Multiply
                        | Divide
                        | IsDistinctFrom
                        | IsNotDistinctFrom
                ) {
                    return Err(refuse(format!("operator `{}` is not allowed in a filter", b.op), expr));
                }
                self.filter_expr(&b.left, tables)?;
                self.filter_expr(&b.right, tables)
            }
            Expr::Not(e)
            | Expr::IsNull(e)
            | Expr::IsNotNull(e)
            | Expr::IsTrue(e)
            | Expr::IsFalse(e)
            | Expr::IsNotTrue(e)
            | Expr::IsNotFalse(e)
            | Expr::Negative(e) => self.filter_expr(e, tables),
            Expr::Between(b) => {
                self.filter_expr(&b.expr, tables)?;
                self.filter_expr(&b.low, tables)?;
                self.filter_expr(&b.high, tables)
            }
            Expr::InList(list) => {
                self.filter_expr(&list.expr, tables)?;
                for item in &list.list {
                    if !matches!(item, Expr::Literal(..)) {
                        return Err(refuse("an IN list holds literals only", item));
                    }
                }
                Ok(())
            }
            Expr::Like(like) => {
                self.filter_expr(&like.expr, tables)?;
                self.filter_expr(&like.pattern, tables)
            }
            Expr::Cast(c) => self.filter_expr(&c.expr, tables),
            Expr::TryCast(c) => self.filter_expr(&c.expr, tables),
            Expr::ScalarFunction(f) => Err(refuse(
                format!("function `{}` is not allowed: filters compare columns with literals", f.name()),
                expr,
            )),
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => Err(refuse(
                "subqueries are not allowed",
                expr,
            )),
            Expr::AggregateFunction(_) | Expr::WindowFunction(_) => Err(refuse(
                "aggregates are not allowed in a filter (HAVING and QUALIFY would select groups on exact values)",
                expr,
            )),
            Expr::Placeholder(_) | Expr::ScalarVariable(..) => Err(refuse("parameters and variables are not allowed", expr)),
            _ => Err(refuse("this expression is not allowed in a filter", expr)),
        }
    }

    fn aggregate(&self, expr: &Expr) -> Result<(String, Aggregate), Refusal> {
        let Expr::AggregateFunction(f) = expr else {
            return Err(refuse("only aggregate functions may be released", expr));
        };
        let name = f.func.name().to_ascii_lowercase();
        let p = &f.params;
        if p.filter.is_some() || !p.order_by.is_empty() || p.null_treatment.is_some() {
            return Err(refuse(
                "aggregates take no FILTER, ORDER BY or null treatment: filter in WHERE",
                expr,
            ));
        }
        let column = |e: &Expr| -> Result<(&'a Table, String), Refusal> {
            match e {
                Expr::Column(c) => Ok((self.table(c)?, c.name.clone())),
                Expr::Cast(c) => match c.expr.as_ref() {
                    Expr::Column(col) => Ok((self.table(col)?, col.name.clone())),
                    other => Err(refuse("an aggregate takes a column", other)),
                },
                other => Err(refuse("an aggregate takes a column", other)),
            }
        };
        let allowed = |table: &Table, kind: &str| -> Result<(), Refusal> {
            if table.terms.aggregates.iter().any(|a| a == kind) {
                Ok(())
            } else {
                Err(refuse(
                    format!(
                        "the offer on `{}` allows {}, not {}",
                        table.name,
                        table.terms.aggregates.join(", "),
                        kind.to_ascii_uppercase()
                    ),
                    expr,
                ))
            }
        };
        match (name.as_str(), p.args.as_slice(), p.distinct) {
            ("count", [Expr::Literal(v, _)], false) if !v.is_null() => {
                let table = self.tables.first().expect("a query reads a table");
                allowed(table, "count")?;
                Ok((table.name.clone(), Aggregate::Count))
            }
            ("count", [arg], true) => {
                let (table, col) = column(arg)?;
                allowed(table, "count")?;
                if col == table.subject {
                    Ok((table.name.clone(), Aggregate::Subjects))
                } else {
                    Err(refuse(
                        format!(
                            "COUNT(DISTINCT) counts individuals only (`{}`): distinct values of other columns have no bounded contribution",
                            table.subject
                        ),
                        expr,
                    ))
                }
            }
            ("count", [arg], false) => {
                let (table, _) = column(arg)?;
                allowed(table, "count")?;
                Err(refuse(
                    "COUNT(column) is not released: count rows with COUNT(*) and filter out NULLs in WHERE",
                    expr,
                ))
            }
            (kind @ ("sum" | "avg"), [arg], false) => {
                let (table, col) = column(arg)?;
                allowed(table, kind)?;
                if col == table.subject {
                    return Err(refuse("the subject column identifies individuals", expr));
                }
                if !table.terms.ranges.contains_key(&col) {
                    return Err(refuse(
                        format!(
                            "`{col}` has no declared range in the offer on `{}`, so its values cannot be clamped",
                            table.name
                        ),
                        expr,
                    ));
                }
                let aggregate = if kind == "sum" {
                    Aggregate::Sum(col)
                } else {
                    Aggregate::Avg(col)
                };
                Ok((table.name.clone(), aggregate))
            }
            (_, _, true) => Err(refuse("DISTINCT is allowed in COUNT(DISTINCT subject) only", expr)),
            (other, _, _) => Err(refuse(
                format!("aggregate `{other}` is not allowed: use COUNT, COUNT(DISTINCT subject), SUM or AVG as the offer allows"),
                expr,
            )),
        }
    }

    /// The rows under the aggregate: filters over a scan, or over an inner join of two
    /// tables on their subject columns.
    fn input(
        &self,
        plan: &LogicalPlan,
        filters: &mut Vec<Expr>,
        tables: &mut Vec<String>,
    ) -> Result<(), Refusal> {
        match plan {
            LogicalPlan::Filter(f) => {
                filters.push(f.predicate.clone());
                self.input(&f.input, filters, tables)
            }
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table();
                if !self.tables.iter().any(|t| t.name == name) {
                    return Err(refuse("the query may read the named datasets only", name));
                }
                tables.push(name.to_string());
                Ok(())
            }
            LogicalPlan::SubqueryAlias(alias) => match alias.input.as_ref() {
                LogicalPlan::TableScan(_) => Err(refuse(
                    "table aliases are not supported: name columns by their dataset",
                    &alias.alias,
                )),
                _ => Err(refuse("subqueries are not allowed", &alias.alias)),
            },
            LogicalPlan::Join(join) => {
                if join.join_type != JoinType::Inner {
                    return Err(refuse(
                        "only an inner join on the subject columns is allowed",
                        join.join_type,
                    ));
                }
                self.input(&join.left, filters, tables)?;
                self.input(&join.right, filters, tables)?;
                let mut keys: Vec<(Expr, Expr)> = join.on.clone();
                if let Some(filter) = &join.filter {
                    for conjunct in split_and(filter) {
                        match conjunct {
                            Expr::BinaryExpr(b) if b.op == Operator::Eq => {
                                keys.push((*b.left.clone(), *b.right.clone()))
                            }
                            other => {
                                return Err(refuse(
                                    "a join's condition is the two subject columns' equality only",
                                    other,
                                ))
                            }
                        }
                    }
                }
                let subject = |e: &Expr| -> Option<String> {
                    let Expr::Column(c) = e else { return None };
                    let table = self.table(c).ok()?;
                    (table.subject == c.name).then(|| table.name.clone())
                };
                match keys.as_slice() {
                    [(l, r)] => match (subject(l), subject(r)) {
                        (Some(a), Some(b)) if a != b => Ok(()),
                        _ => Err(refuse(
                            "a join must match the two datasets' subject columns",
                            format!("{l} = {r}"),
                        )),
                    },
                    _ => Err(refuse(
                        "a join must match the two datasets' subject columns, and nothing else",
                        join.join_type,
                    )),
                }
            }
            LogicalPlan::Projection(_) => {
                Err(refuse("subqueries are not allowed", "a nested SELECT"))
            }
            LogicalPlan::Limit(_) => Err(refuse(
                "LIMIT is not allowed: groups are released whole or not at all",
                "LIMIT",
            )),
            LogicalPlan::Sort(_) => Err(refuse(
                "ORDER BY is not allowed: sort the released result yourself",
                "ORDER BY",
            )),
            LogicalPlan::Aggregate(_) => Err(refuse(
                "aggregates of aggregates are not allowed",
                "a nested aggregate",
            )),
            LogicalPlan::Window(_) => Err(refuse("window functions are not allowed", "OVER (…)")),
            LogicalPlan::Union(_) => Err(refuse("UNION is not allowed", "UNION")),
            LogicalPlan::Distinct(_) => Err(refuse("SELECT DISTINCT is not allowed", "DISTINCT")),
            other => Err(refuse(
                "this part of a query is not allowed",
                other.display(),
            )),
        }
    }
}

fn split_and(expr: &Expr) -> Vec<&Expr> {
    match expr {
        Expr::BinaryExpr(b) if b.op == Operator::And => {
            let mut out = split_and(&b.left);
            out.extend(split_and(&b.right));
            out
        }
        other => vec![other],
    }
}

fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(a) => strip_alias(&a.expr),
        other => other,
    }
}

/// Checks an unoptimised logical plan against the tables' offers.
pub fn check(plan: &LogicalPlan, tables: &[Table]) -> Result<Shape, Refusal> {
    let walk = Walk { tables };
    let LogicalPlan::Projection(projection) = plan else {
        return Err(match plan {
            LogicalPlan::Sort(_) => refuse(
                "ORDER BY is not allowed: sort the released result yourself",
                "ORDER BY",
            ),
            LogicalPlan::Limit(_) => refuse(
                "LIMIT is not allowed: groups are released whole or not at all",
                "LIMIT",
            ),
            LogicalPlan::Distinct(_) => refuse("SELECT DISTINCT is not allowed", "DISTINCT"),
            LogicalPlan::Union(_) => refuse("UNION is not allowed", "UNION"),
            other => refuse(
                "the query must be one SELECT of aggregates",
                other.display(),
            ),
        });
    };
    let LogicalPlan::Aggregate(aggregate) = projection.input.as_ref() else {
        return Err(match projection.input.as_ref() {
            LogicalPlan::Filter(f) if matches!(f.input.as_ref(), LogicalPlan::Aggregate(_)) => {
                refuse(
                    "HAVING is not allowed: it would select groups on exact values",
                    &f.predicate,
                )
            }
            _ => {
                let raw = projection
                    .expr
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "*".into());
                refuse(
                    "the output must be an aggregate: raw rows never leave the vault",
                    raw,
                )
            }
        });
    };
    let mut raw_filters = Vec::new();
    let mut tables_read = Vec::new();
    walk.input(&aggregate.input, &mut raw_filters, &mut tables_read)?;
    let mut groups = Vec::new();
    for group in &aggregate.group_expr {
        match group {
            Expr::Column(c) => {
                let table = walk.table(c)?;
                if c.name == table.subject {
                    return Err(refuse(
                        "grouping by the subject column would describe individuals",
                        c,
                    ));
                }
                if !table.terms.dimensions.contains(&c.name) {
                    return Err(refuse(
                        format!(
                            "`{}` is not a dimension of the offer on `{}` ({})",
                            c.name,
                            table.name,
                            if table.terms.dimensions.is_empty() {
                                "it allows none".to_string()
                            } else {
                                table.terms.dimensions.join(", ")
                            }
                        ),
                        c,
                    ));
                }
                groups.push((table.name.clone(), c.name.clone()));
            }
            Expr::GroupingSet(_) => {
                return Err(refuse(
                    "GROUPING SETS, ROLLUP and CUBE are not allowed",
                    group,
                ))
            }
            other => return Err(refuse("group by a dimension column", other)),
        }
    }
    let mut aggregates = Vec::new();
    for expr in &aggregate.aggr_expr {
        aggregates.push(walk.aggregate(strip_alias(expr))?);
    }
    let group_count = aggregate.group_expr.len();
    let mut outputs = Vec::new();
    let qualify = tables_read.len() > 1;
    for expr in &projection.expr {
        let inner = strip_alias(expr);
        let alias = match expr {
            Expr::Alias(a) => Some(a.name.clone()),
            _ => None,
        };
        let index = match inner {
            Expr::Column(c) => aggregate.schema.index_of_column(c).ok(),
            other => aggregate
                .group_expr
                .iter()
                .chain(aggregate.aggr_expr.iter())
                .position(|e| strip_alias(e) == other),
        }
        .ok_or_else(|| {
            refuse(
                "the output lists dimensions and aggregates only, with no arithmetic on them",
                expr,
            )
        })?;
        let output = if index < group_count {
            let (table, column) = &groups[index];
            Output {
                name: alias.unwrap_or_else(|| column.clone()),
                table: table.clone(),
                dimension: Some(column.clone()),
                aggregate: None,
            }
        } else {
            let (table, aggregate) = &aggregates[index - group_count];
            let of = |c: &str| {
                if qualify {
                    format!("{table}.{c}")
                } else {
                    c.to_string()
                }
            };
            let default = match aggregate {
                Aggregate::Count => "count(*)".to_string(),
                Aggregate::Subjects => {
                    let subject = &walk
                        .tables
                        .iter()
                        .find(|t| &t.name == table)
                        .expect("a read table")
                        .subject;
                    format!("count(distinct {})", of(subject))
                }
                Aggregate::Sum(c) => format!("sum({})", of(c)),
                Aggregate::Avg(c) => format!("avg({})", of(c)),
            };
            Output {
                name: alias.unwrap_or(default),
                table: table.clone(),
                dimension: None,
                aggregate: Some(aggregate.clone()),
            }
        };
        if outputs.iter().any(|o: &Output| o.name == output.name) {
            return Err(refuse("two outputs share a name: alias them", &output.name));
        }
        outputs.push(output);
    }
    if !outputs.iter().any(|o| o.aggregate.is_some()) {
        return Err(refuse(
            "the output must be an aggregate: raw rows never leave the vault",
            projection
                .expr
                .first()
                .map(|e| e.to_string())
                .unwrap_or_default(),
        ));
    }
    let mut per_table: BTreeMap<String, Vec<Expr>> = BTreeMap::new();
    for filter in &raw_filters {
        walk.predicate(filter, &mut per_table)?;
    }
    if tables_read.len() == 2 {
        let grouped_by: Vec<&String> = outputs
            .iter()
            .filter(|o| o.dimension.is_some())
            .map(|o| &o.table)
            .collect();
        if let Some(group_table) = grouped_by.first() {
            if let Some(other) = outputs.iter().find(|o| &&o.table != group_table) {
                return Err(refuse(
                    format!(
                        "grouping by `{group_table}` while releasing a value of `{}` would need per-row linkage across vaults; each vault answers with its own columns",
                        other.table
                    ),
                    &other.name,
                ));
            }
        }
    }
    let filters = per_table
        .into_iter()
        .map(|(table, conjuncts)| {
            let text = conjuncts
                .iter()
                .map(|e| format!("({})", unqualified(e)))
                .collect::<Vec<_>>()
                .join(" AND ");
            (table, text)
        })
        .collect();
    Ok(Shape {
        tables: tables_read,
        outputs,
        filters,
    })
}

/// The expression as SQL over its own table, column names unqualified and quoted.
fn unqualified(expr: &Expr) -> String {
    use datafusion::common::tree_node::{Transformed, TreeNode};
    let bare = expr
        .clone()
        .transform(|e| {
            Ok(match e {
                Expr::Column(c) => {
                    Transformed::yes(Expr::Column(DfColumn::new_unqualified(c.name)))
                }
                other => Transformed::no(other),
            })
        })
        .map(|t| t.data)
        .unwrap_or_else(|_| expr.clone());
    match datafusion::sql::unparser::expr_to_sql(&bare) {
        Ok(sql) => sql.to_string(),
        Err(_) => bare.to_string(),
    }
}
