// Command promcheck validates Prometheus rule files as `promtool check
// rules` does (Prometheus's own rulefmt and PromQL parser: YAML shape,
// every expression, every label and annotation template) and prints, for
// each alert, the metric names its expression selects, one
// "alert<TAB>metric" line each. The e2e suite checks those names against
// what the shardpool pods export.
//
// Usage: promcheck RULES.yaml
package main

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: promcheck RULES.yaml")
		os.Exit(2)
	}
	p := parser.NewParser(parser.Options{})
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	groups, errs := rulefmt.ParseFile(os.Args[1], false, model.UTF8Validation, p, logger)
	if len(errs) > 0 {
		for _, e := range errs {
			fmt.Fprintln(os.Stderr, "invalid:", e)
		}
		os.Exit(1)
	}
	n := 0
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			name := r.Alert
			if name == "" {
				name = r.Record
			}
			expr, err := p.ParseExpr(r.Expr)
			if err != nil {
				fmt.Fprintf(os.Stderr, "invalid: %s: %v\n", name, err)
				os.Exit(1)
			}
			seen := map[string]bool{}
			parser.Inspect(expr, func(node parser.Node, _ []parser.Node) error {
				if vs, ok := node.(*parser.VectorSelector); ok && vs.Name != "" {
					seen[vs.Name] = true
				}
				return nil
			})
			var names []string
			for m := range seen {
				names = append(names, m)
			}
			sort.Strings(names)
			for _, m := range names {
				fmt.Printf("%s\t%s\n", name, m)
			}
			n++
		}
	}
	if n == 0 {
		fmt.Fprintln(os.Stderr, "invalid: no rules")
		os.Exit(1)
	}
}
